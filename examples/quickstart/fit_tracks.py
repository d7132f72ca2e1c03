"""Stage 2 of the demo pipeline: fit a straight-line phi(r) per track and write a tiny 'model' (mean curvature)."""

import csv
import json
import sys
from collections import defaultdict

hits_path, lr, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
tracks: dict[str, list[tuple[float, float]]] = defaultdict(list)
with open(hits_path) as fh:
    for row in csv.DictReader(fh):
        tracks[row["track_id"]].append((float(row["r"]), float(row["phi"])))
slopes = []
for points in tracks.values():
    n = len(points)
    mr = sum(r for r, _ in points) / n
    mp = sum(p for _, p in points) / n
    slopes.append(sum((r - mr) * (p - mp) for r, p in points) / sum((r - mr) ** 2 for r, _ in points))
model = {"tracks": len(slopes), "mean_curvature": sum(slopes) / len(slopes), "learning_rate": lr}
with open(out, "w") as fh:
    json.dump(model, fh, indent=2)
print(f"fitted {len(slopes)} tracks -> {out}")
