"""Burn snakemake.params.seconds of CPU time, then write the output."""

import time

end = time.process_time() + snakemake.params.seconds  # type: ignore[name-defined]  # noqa: F821
while time.process_time() < end:
    pass
with open(snakemake.output[0], "w") as fh:  # type: ignore[name-defined]  # noqa: F821
    fh.write("script\n")
