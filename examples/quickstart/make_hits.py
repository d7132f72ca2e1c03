"""Stage 1 of the demo pipeline: generate a small synthetic particle-detector hit table (deterministic)."""

import csv
import math
import random
import sys

seed, n_tracks, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
with open(out, "w", newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(["hit_id", "track_id", "layer", "r", "phi", "z"])
    hit = 0
    for track in range(n_tracks):
        phi0, eta = rng.uniform(-math.pi, math.pi), rng.uniform(-2, 2)
        curvature = rng.uniform(-0.002, 0.002)
        for layer in range(8):
            r = 30.0 + 40.0 * layer
            phi = phi0 + curvature * r + rng.gauss(0, 0.001)
            writer.writerow([hit, track, layer, f"{r:.1f}", f"{phi:.5f}", f"{r * math.sinh(eta):.2f}"])
            hit += 1
print(f"wrote {hit} hits of {n_tracks} tracks to {out}")
