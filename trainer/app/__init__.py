"""What users call: the ``ltx2-av-trainer`` command (``cli``), the steps it shares with the ComfyUI nodes
(``pipeline``), the demo, the benchmark and the console output."""
