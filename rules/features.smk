# Coordinates -> feature bags: one job per slide and encoder writes the bag of every patch-selection
# strategy the experiments use (results/features/<key>-<hash>-<strategy>/<slide>.pt), reading and
# encoding the patches the strategies share once. With features.server (the default) the job hands
# its slide to a feature server that keeps the encoder loaded between jobs (README: Throughput). Hub weights (`weights: hf-hub:<org>/<repo>`) are
# fetched once, before any extraction, on the machine that runs Snakemake (HF_TOKEN for gated
# repos); extraction jobs read only the Hugging Face cache. The weights file (or the fetch record)
# is an input of extraction, so new weights re-extract.

localrules:
    fetch_weights,


rule fetch_weights:
    output:
        layout.weights_record("{key}"),
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
        # not the slide: it is preprocess_slide's input, and a new or changed slide file makes
        # that job, the coordinates and so this one again
        coords=extract_coords(),
        weights=encoder_weights(),
    output:
        extract_outputs(),
    params:
        settings=extract_settings(),
        options=extract_options,
    log:
        "logs/extract_features/{encoder}/{slide}.log",
    benchmark:
        "benchmarks/extract_features/{encoder}/{slide}.tsv"
    group:
        slide_group(gpu=True)
    # one thread per job: on a workstation's CPU two jobs side by side keep two cores busy, each
    # with its own feature server (features.server), which keeps the encoder loaded between slides
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil extract {params.options} --slide-id {wildcards.slide:q} {params.settings}"
        " --threads {threads} --no-progress 2> {log:q}"


# One input for the cohort steps instead of one per slide (common.smk: write_slide_index); it
# runs in the Snakemake process (a local rule: no cluster job, no process start).
rule index_bags:
    input:
        feature_set_bags,
    output:
        layout.bag_index("{feature_set}"),
    log:
        "logs/index_bags/{feature_set}.log",
    localrule: True
    run:
        write_slide_index(output[0], bag=input)


# left_out.csv: the screening's list, then the kept slides whose bags are empty (tiles that failed
# to decode, no patch at any scale), under the screening's policy (msamil left-out). Those slides'
# bags are read (an empty bag is a few kB; larger ones are not opened).
rule list_left_out:
    input:
        sheet=SCREENED_SHEET,
        screening=SCREENING_LEFT_OUT,
        bags=[layout.bag_index(feature_set) for feature_set in all_feature_sets()],
    output:
        LEFT_OUT,
    params:
        options=CFG.left_out_options(),
    log:
        "logs/list_left_out.log",
    localrule: True
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil left-out --sheet {input.sheet:q} --screening {input.screening:q} --bag-index {input.bags:q}"
        " {params.options} --out {output:q} 2> {log:q}"
