"""DistServe's simulator samples prompts from data/sharegpt.dataset (a marshal file of
(prompt, prompt_len, output_len)); it only reads the lengths. Write one from the ShareGPT
lengths the planner's comparison set uses (../shared/data/sharegpt_opt_lengths.csv), so both
searches sample the same distribution.

    python make_dataset.py LENGTHS_CSV OUT_FILE
"""

import csv
import marshal
import sys

with open(sys.argv[1]) as f:
    rows = [("", int(r["input_len"]), int(r["output_len"])) for r in csv.DictReader(f)]
with open(sys.argv[2], "wb") as f:
    marshal.dump({"dataset_name": "sharegpt", "data": rows}, f)
print(f"{len(rows)} requests -> {sys.argv[2]}")
