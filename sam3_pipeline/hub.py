"""Before the weights load: can this process get the checkpoint from the Hugging Face Hub?

One HEAD request for the checkpoint's config answers in well under a second, and each way it can
fail gets its own line that names the fix. Without it, transformers' `from_pretrained` on a
machine that cannot reach the Hub retries for minutes, a retry line each time, and then blames
the token whatever the cause.

Setup fetches the weights through it too, so that a missing token fails there in the same line:

    python -m sam3_pipeline.hub facebook/sam3   # check, then download into the Hugging Face cache
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from sam3_pipeline.messages import UsageError, one_line

PROBE_FILE = "config.json"  # the first file from_pretrained asks for; every checkpoint has one
PROBE_TIMEOUT_S = 10.0  # huggingface_hub's own timeout for such a request
TOKENS_PAGE = "https://huggingface.co/settings/tokens"
OFFLINE_HINT = "pass --model a local folder of the checkpoint to run offline"


def is_cached(model_id: str) -> bool:
    """Whether the Hugging Face cache holds the checkpoint (its config, at least) from an earlier download."""
    return isinstance(huggingface_hub.try_to_load_from_cache(model_id, PROBE_FILE), str)


def must_load_from_cache(model_id: str) -> bool:
    """Check that `model_id` can be loaded before loading it: True when it must come from the local
    cache only (the Hub is unreachable or offline mode is on, and an earlier download is cached),
    False when the Hub serves it to the token `from_pretrained` will use (HF_TOKEN, else that of
    `hf auth login`). Raises UsageError naming the fix otherwise."""
    token = huggingface_hub.get_token()
    if constants.HF_HUB_OFFLINE:
        if is_cached(model_id):
            return True
        raise UsageError(
            f"cannot load model {model_id}: HF_HUB_OFFLINE is set and the Hugging Face cache does not hold it: "
            f"unset HF_HUB_OFFLINE to download it, or {OFFLINE_HINT}"
        )
    page = f"{constants.ENDPOINT}/{model_id}"
    try:
        huggingface_hub.get_hf_file_metadata(
            huggingface_hub.hf_hub_url(model_id, PROBE_FILE), token=token or False, timeout=PROBE_TIMEOUT_S
        )
        return False
    except GatedRepoError:
        if token:
            raise UsageError(
                f"cannot load model {model_id}: the account of the token (HF_TOKEN or `hf auth login`) has no "
                f"access to this gated checkpoint yet: request it at {page} (approval can take a while), then run again"
            ) from None
        raise UsageError(
            f"cannot load model {model_id}: HF_TOKEN is not set: request access at {page}, "
            f"then export HF_TOKEN=hf_... with a token of that account ({TOKENS_PAGE}), or run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise UsageError(
            f"cannot load model {model_id}: the Hugging Face Hub has no model of that name "
            f"(or it is private to another account): check --model"
        ) from None
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise UsageError(
                f"cannot load model {model_id}: the Hugging Face Hub does not accept the token "
                f"(HF_TOKEN or `hf auth login`): copy a token again from {TOKENS_PAGE}"
            ) from None
        reason = one_line(error)
    except Exception as error:  # whatever kept the Hub from answering: DNS, refused, timeout, proxy
        reason = one_line(error)
    if is_cached(model_id):
        return True
    raise UsageError(
        f"cannot load model {model_id}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}), "
        f"and the checkpoint is not in the local cache: check the network, or {OFFLINE_HINT}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check access to a SAM3 checkpoint on the Hub, then download it.")
    parser.add_argument("model", help="Hub model ID, e.g. facebook/sam3 (uses HF_TOKEN)")
    model = parser.parse_args(argv).model
    try:
        if must_load_from_cache(model):
            print(f"{model}: the Hub cannot be reached; using the copy in the Hugging Face cache", file=sys.stderr)
            return 0
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # The original checkpoint's .pt duplicates the safetensors transformers loads.
    huggingface_hub.snapshot_download(model, ignore_patterns=["*.pt"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
