"""The building blocks of process_segmentation.py, one module per concern.

messages (errors and log lines), dataset (which videos, keyed how, this job's share), device (GPU
or CPU, precision), video_io (frames in, H.264 out), sam3 (the model, sessions, windows, masks),
overlay (drawing and the preview), outputs (records and files written safely), summary
(`--summarize`). The pipeline that joins them is process_segmentation.py.
"""
