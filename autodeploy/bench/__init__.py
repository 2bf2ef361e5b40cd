"""`autodeploy bench`: latency and offline-throughput measurements of the in-flight runtime, with
the peers (HF transformers eager, HF static cache + torch.compile) and the batch-1 decode ceiling
(weight bytes over the device's measured copy bandwidth) measured in the same run.

workload.py says what is asked (request lengths, random prompts), ours.py and hf.py run it,
metrics.py turns per-token timestamps into TTFT / inter-token latency / tok/s, device.py measures
the ceiling, suite.py ties them together, report.py prints the table.
"""
