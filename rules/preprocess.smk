# Slides -> thumbnails, tissue masks and 20x/10x/5x patch coordinates.

if DEMO:

    rule make_demo_cohort:
        output:
            sheet=config["demo"]["sheet"],
            slides=[workflow_path(p) for p in SLIDES["path"]],
            annotations=[workflow_path(p) for p in SLIDES["annotation"] if p],
        params:
            out_dir=demo_dir,
            options=CFG.demo_options(),
        log:
            "logs/make_demo_cohort.log",
        threads: 2
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../envs/msamil.yaml"
        shell:
            "msamil demo --out {params.out_dir:q} {params.options} --threads {threads} 2> {log:q}"


checkpoint screen_slides:
    input:
        sheet=sheet_file(),
        files=SCREENING_INPUTS,
    output:
        sheet=SCREENED_SHEET,
        left_out=LEFT_OUT,
        record=SCREEN_RECORD,
    params:
        cache=SCREEN_CACHE,
        options=CFG.screen_options(),
    log:
        "logs/screen_slides.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil screen --sheet {input.sheet:q} --out {output.sheet:q} --left-out {output.left_out:q}"
        " --record {output.record:q} --cache {params.cache:q} {params.options} --threads {threads}"
        " 2> {log:q}"


rule make_thumbnail:
    input:
        slide=slide_file,
    output:
        png="results/slides/{slide}/thumbnail.png",
        meta="results/slides/{slide}/meta.json",
    params:
        path=slide_path,
        options=thumbnail_options,
    log:
        "logs/make_thumbnail/{slide}.log",
    group:
        slide_group(masks=True)
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil thumbnail --slide {params.path:q} --slide-id {wildcards.slide:q} {params.options}"
        " --out {output.png:q} --meta {output.meta:q} 2> {log:q}"


rule make_tissue_mask:
    input:
        "results/slides/{slide}/thumbnail.png",
    output:
        "results/slides/{slide}/tissue_mask.png",
    params:
        options=CFG.tissue_options(),
    log:
        "logs/make_tissue_mask/{slide}.log",
    group:
        slide_group(masks=True)
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil tissue --thumbnail {input:q} --slide-id {wildcards.slide:q} {params.options}"
        " --out {output:q} 2> {log:q}"


rule make_patch_coordinates:
    input:
        **coords_selection(),
        meta="results/slides/{slide}/meta.json",
    output:
        # every strategy in use: results/coords/{scale}/ (patches.strategy), coords/{strategy}/{scale}/
        coords_outputs(),
    params:
        # options (the output files) is a derived param, which Snakemake's rerun-trigger leaves
        # out; settings, in options too, reruns the coordinates when the grid changes
        settings=coords_settings(),
        options=coords_options,
    log:
        "logs/make_patch_coordinates/{slide}.log",
    group:
        slide_group()
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil coords --meta {input.meta:q} --tissue-mask {input.tissue:q} {params.options} 2> {log:q}"


# One input for the cohort steps that read every thumbnail (draw_heatmaps); see index_bags.
rule index_thumbnails:
    input:
        unpack(slide_thumbnails),
    output:
        "results/thumbnails.tsv",
    log:
        "logs/index_thumbnails.log",
    localrule: True
    run:
        write_slide_index(output[0], thumbnail=input.thumbnail, meta=input.meta)
