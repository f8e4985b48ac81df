# Slides -> thumbnails, tissue masks and 20x/10x/5x patch coordinates.

if DEMO:

    rule make_demo_cohort:
        output:
            sheet=SETTINGS.demo.sheet,
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
        left_out=SCREENING_LEFT_OUT,
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


# Per slide, one preprocessing job (msamil preprocess): thumbnail, meta.json, tissue mask, the
# coordinates of every strategy in use and, with `export_geojson`, the QuPath export. With lesion
# patches the coordinates wait for the lesion mask (segment.smk): the job then stops at the tissue
# mask, and make_patch_coordinates follows segment_lesions. One job instead of four keeps the
# planning of a large cohort and the cluster jobs per slide few; a change to the tissue or patch
# settings makes the whole job again (the extraction after it runs again anyway).
rule preprocess_slide:
    input:
        slide=slide_file,
    output:
        png=layout.slide_file("{slide}", layout.THUMBNAIL),
        meta=layout.slide_file("{slide}", layout.META),
        tissue=layout.slide_file("{slide}", layout.TISSUE_MASK),
        # the coordinates and patches.geojson, unless they wait for a lesion mask
        **preprocess_coords_outputs(),
    params:
        options=thumbnail_options,
        tissue=CFG.tissue_options(),
        settings=coords_settings() if not CFG.uses_lesion else "",
        coords=preprocess_coords_options,
    log:
        "logs/preprocess_slide/{slide}.log",
    benchmark:
        "benchmarks/preprocess_slide/{slide}.tsv"
    group:
        slide_group(masks=True)
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil preprocess {params.options} --slide-id {wildcards.slide:q} --thumbnail {output.png:q}"
        " --meta {output.meta:q} --tissue-mask {output.tissue:q} {params.tissue} {params.coords} 2> {log:q}"


if CFG.uses_lesion:

    # The coordinates of every strategy in use and, with `export_geojson`, the QuPath export.
    rule make_patch_coordinates:
        input:
            **coords_selection(),
            meta=layout.slide_file("{slide}", layout.META),
        output:
            # every strategy in use: results/coords/{scale}/ (patches.strategy), coords/{strategy}/{scale}/
            coords_outputs(),
            **geojson_output(),
        params:
            # options (the output files) is a derived param, which Snakemake's rerun-trigger leaves
            # out; settings, in options too, reruns the coordinates when the grid changes
            settings=coords_settings(),
            options=coords_options,
        log:
            "logs/make_patch_coordinates/{slide}.log",
        benchmark:
            "benchmarks/make_patch_coordinates/{slide}.tsv"
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


# Every slide's coordinates; the job that writes the GeoJSON export writes them too, so asking for
# it asks for them.
PER_SLIDE_TARGETS.extend([layout.slide_file("{slide}", layout.GEOJSON)] if SETTINGS.export_geojson else coords_outputs())


# One input for the cohort steps that read every thumbnail (draw_heatmaps); see index_bags.
rule index_thumbnails:
    input:
        slide_metas,
    output:
        layout.thumbnail_index(),
    log:
        "logs/index_thumbnails.log",
    localrule: True
    run:
        write_slide_index(output[0], thumbnail=slide_thumbnails(), meta=input)
