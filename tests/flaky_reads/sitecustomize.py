"""A stand-in for a bucket mount's read error, loaded by Python at start-up from PYTHONPATH.

With FLAKY_VIDEO=<file name>, opening that video with PyAV fails as a FUSE mount's failed read
does (EIO): its first FLAKY_READS opens in this process, or every one with FLAKY_READS=always.
Other files, and processes without FLAKY_VIDEO, are untouched.
"""

import errno
import os

if os.environ.get("FLAKY_VIDEO"):
    import av

    _open = av.open
    _failures = {"left": os.environ.get("FLAKY_READS", "always")}

    def _flaky_open(file, *args, **kwargs):
        left = _failures["left"]
        if os.path.basename(str(file)) == os.environ["FLAKY_VIDEO"] and left != "0":
            if left != "always":
                _failures["left"] = str(int(left) - 1)
            raise av.error.OSError(errno.EIO, os.strerror(errno.EIO), str(file))
        return _open(file, *args, **kwargs)

    av.open = _flaky_open
