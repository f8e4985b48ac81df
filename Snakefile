# msamil: whole-slide images -> multi-scale MIL. Wiring only; msamil_core computes.
# Run:  snakemake --cores N            (the demo cohort, config/config.yaml)
#       snakemake --cores N --config slides=my_cohort.csv
import os

from snakemake.utils import min_version

min_version("9.0")


# The repository's defaults, found from the Snakefile so that `--directory` runs work too;
# --configfile and --config on the command line are merged on top. rules/common.smk checks every
# key and value against the settings model (msamil_core/settings.py) before any job is planned.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")

# envs/msamil.yaml (`--sdm conda`) pip-installs the package from this checkout; Snakemake
# builds environments from a copy of the file under .snakemake/conda/, so a relative path
# there would not lead back here, and pip expands ${MSAMIL_SOURCE} in requirements instead.
os.environ.update(MSAMIL_SOURCE=workflow.basedir)


include: "rules/common.smk"
include: "rules/preprocess.smk"
include: "rules/segment.smk"
include: "rules/features.smk"
include: "rules/train.smk"
include: "rules/predict.smk"
include: "rules/e2e.smk"
include: "rules/report.smk"


rule all:
    input:
        final_outputs,
    default_target: True


# Partial runs (README: Partial runs): `snakemake preprocess` (make preprocess) stops after every
# kept slide's thumbnail, masks, coordinates and GeoJSON; `snakemake features` (make features)
# after their feature bags, and writes results/features/folders.tsv, which names each encoder
# key's and strategy's folder; `snakemake features_<key>` extracts one encoder's bags only.
rule preprocess:
    input:
        per_slide_targets,
    localrule: True


rule features:
    input:
        bags=lambda wildcards: base_bags(),
    output:
        layout.feature_folders_index(),
    log:
        "logs/features.log",
    localrule: True
    run:
        write_feature_folders(output[0])


for _key in CFG.encoder_dirs:

    rule:
        name:
            f"features_{_key}"
        input:
            lambda wildcards, key=_key: base_bags(key),
        localrule: True
