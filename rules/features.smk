# Coordinates -> feature bags, one per slide and encoder.


rule extract_features:
    input:
        slide=slide_file,
        coords=slide_coords,
    output:
        "results/features/{encoder}/{slide}.pt",
    params:
        path=slide_path,
        mpp=mpp_option,
        options=encoder_options,
    log:
        "logs/extract_features/{encoder}/{slide}.log",
    benchmark:
        "benchmarks/extract_features/{encoder}/{slide}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil extract --slide {params.path:q} --slide-id {wildcards.slide:q} {params.mpp}"
        " --coords {input.coords:q} --out {output:q} {params.options} --threads {threads}"
        " --no-progress 2> {log:q}"
