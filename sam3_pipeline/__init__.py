"""The building blocks of process_segmentation.py, one module per concern.

messages (errors and log lines), dataset (which videos, keyed how, this job's share of their
windows), device (GPU or CPU, precision), hub (whether the checkpoint can be fetched, one line
if not), video_io (frames in, sought and sampled; H.264 out, and parts joined), sam3 (the model,
sessions, windows, masks), overlay (drawing and the preview), files (JSON written whole, read
forgivingly), outputs (records and files written safely), windows (a video's windows and their
files), assembly (a video's results from its windows), stages (running them side by side),
summary (`--summarize`), progress (each job's account, and `python3 -m sam3_pipeline.progress`),
tracks (a tracks file read back frame by frame). The pipeline that joins them is
process_segmentation.py.
"""
