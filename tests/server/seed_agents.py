"""The seed's four agents (``my-fetcher``, ``data-validator``, ``processor``,
``aggregator``) as local commands for the process runtime: ``python seed_agents.py ROLE``.

Each reads what the seed's ``DataWorkflow`` puts in its environment and writes its JSON
output to ``$FLOW_OUTPUT``. The fetcher proves it got the secret without printing it: it
compares the key's SHA-256 with the digest given as its second argument.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time


def main() -> None:
    role = sys.argv[1]
    env = os.environ
    if role == "fetcher":
        key = env.get("API_KEY", "")
        source = env["SOURCE_URL"]
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in source.split("://")[-1])
        print(f"fetching {source} (key: {len(key)} chars)")
        out = {"data_path": f"/data/{name}.json", "source_url": source,
               "has_key": hashlib.sha256(key.encode()).hexdigest() == sys.argv[2]}
    elif role == "validator":
        print(f"validating {env.get('DATA_PATH')}")
        out = {"is_valid": bool(env.get("DATA_PATH")), "data_path": env.get("DATA_PATH")}
    elif role == "processor":
        print(f"chunk {env['CHUNK_ID']} of {env['TOTAL_CHUNKS']}")
        time.sleep(0.2)
        out = {"chunk": int(env["CHUNK_ID"]), "total": int(env["TOTAL_CHUNKS"]),
               "data_path": env["DATA_PATH"]}
    else:
        results = json.loads(env["CHUNK_RESULTS"])
        print(f"aggregating {len(results)} chunk results into {env['OUTPUT_PATH']}")
        out = {"chunks": len(results),
               "chunk_ids": sorted(r["chunk"] for r in results),
               "output_path": env["OUTPUT_PATH"]}
    with open(env["FLOW_OUTPUT"], "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
