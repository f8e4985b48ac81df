# Coordinates -> feature bags: one job per slide and encoder writes the bag of every patch-selection
# strategy the experiments use (results/features/<key>-<hash>-<strategy>/<slide>.pt), reading and
# encoding the patches the strategies share once.


rule extract_features:
    input:
        slide=slide_file,
        coords=extract_coords,
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
