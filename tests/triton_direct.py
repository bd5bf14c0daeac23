"""Direct v2 requests with NVIDIA's own client, for tests/test_triton.py (the reference).

Runs in the Triton venv (``tritonclient[http]``), not the project's:
``python triton_direct.py URL JOBS.npz OUT.npz``. JOBS.npz holds ``jobs`` (a JSON list of
``{"model", "version", "inputs": [names]}``) and, per job ``k``, the arrays ``k/NAME``;
OUT.npz gets ``k`` = the first output of job ``k``, as the server answered it (binary).
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import np_to_triton_dtype

url, jobs_path, out_path = sys.argv[1:4]
jobs = np.load(jobs_path)
spec = json.loads(str(jobs["jobs"]))
client = httpclient.InferenceServerClient(url.removeprefix("http://"))
out = {}
for k, job in enumerate(spec):
    inputs = []
    for name in job["inputs"]:
        arr = jobs[f"{k}/{name}"]
        inp = httpclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr, binary_data=True)
        inputs.append(inp)
    res = client.infer(job["model"], inputs, model_version=job["version"],
                       outputs=[httpclient.InferRequestedOutput("score", binary_data=True)])
    out[str(k)] = res.as_numpy("score")
np.savez(out_path, **out)
