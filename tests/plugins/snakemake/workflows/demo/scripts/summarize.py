# Run by Snakemake's script: directive, which provides the ``snakemake`` object.
lines = [snakemake.params.title]  # noqa: F821
for path in snakemake.input:  # noqa: F821
    with open(path) as fh:
        lines.append(fh.read().strip())
with open(snakemake.output[0], "w") as out:  # noqa: F821
    out.write("\n".join(lines) + "\n")
