"""A tiny agent: counts the words of one chunk of text and reports JSON via $FLOW_OUTPUT."""

import json
import os

text = os.environ["TEXT"]
chunk, total = int(os.environ["CHUNK_ID"]), int(os.environ["TOTAL_CHUNKS"])
words = text.split()
mine = words[chunk::total]
print(f"chunk {chunk}/{total}: {len(mine)} words")  # goes to the agent's log
with open(os.environ["FLOW_OUTPUT"], "w") as f:
    json.dump({"chunk": chunk, "words": len(mine), "longest": max(mine, key=len, default="")}, f)
