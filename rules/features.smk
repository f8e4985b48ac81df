# Coordinates -> feature bags: one job per slide and encoder writes the bag of every patch-selection
# strategy the experiments use (results/features/<key>-<hash>-<strategy>/<slide>.pt), reading and
# encoding the patches the strategies share once. Hub weights (`weights: hf-hub:<org>/<repo>`) are
# fetched once, before any extraction, on the machine that runs Snakemake (HF_TOKEN for gated
# repos); extraction jobs read only the Hugging Face cache. The weights file (or the fetch record)
# is an input of extraction, so new weights re-extract.

localrules:
    fetch_weights,


rule fetch_weights:
    output:
        "results/weights/{key}.json",
    params:
        options=fetch_weights_options,
    log:
        "logs/fetch_weights/{key}.log",
    wildcard_constraints:
        key=_alternatives(CFG.hub_encoders()),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=240,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil fetch-weights {params.options} --record {output:q} 2> {log:q}"



rule extract_features:
    input:
        slide=slide_file,
        coords=extract_coords,
        weights=extract_weights,
    output:
        extract_outputs(),
    params:
        path=slide_path,
        options=extract_options,
    log:
        "logs/extract_features/{encoder}/{slide}.log",
    benchmark:
        "benchmarks/extract_features/{encoder}/{slide}.tsv"
    # one thread per job: two jobs side by side keep both cores busy while one starts up
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil extract --slide {params.path:q} --slide-id {wildcards.slide:q} {params.options}"
        " --threads {threads} --no-progress 2> {log:q}"
