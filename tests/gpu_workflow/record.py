"""A fake GPU job: record the GPUs it was given and when it ran, holding them for a few seconds."""
import json
import os
import socket
import sys
import time

out, hold = sys.argv[1], float(sys.argv[2])
start = time.time()
time.sleep(hold)
seen = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_GPUS",
                                       "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL", "SLURM_NTASKS")}
seen.update(start=start, end=time.time(), pid=os.getpid(), host=socket.gethostname())
with open(out, "w") as f:
    json.dump(seen, f)
