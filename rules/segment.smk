# Lesion segmentation (MsaMIL-Net section 3.1): UNet++ trained on the annotated thumbnails,
# then run on every slide's thumbnail; the lesion patch strategy selects on its masks.
# train_segmentation also leaves its slides' lesion probabilities (with the checkpoint's and the
# thumbnail's SHA-256) in results/segmentation/probabilities/, and segment_lesions takes them
# when both digests match instead of loading the network (seconds of imports per slide).


rule train_segmentation:
    input:
        unpack(segmentation_inputs),
        sheet=SCREENED_SHEET,
    output:
        checkpoint=layout.segmentation_file("checkpoint.pt"),
        metrics=layout.segmentation_file("metrics.json"),
    params:
        options=CFG.segment_train_options(),
        probabilities=layout.segmentation_file("probabilities"),
    log:
        "logs/train_segmentation.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil segment-train --sheet {input.sheet:q} --thumbnails {input.thumbnails:q}"
        " --out {output.checkpoint:q} --metrics {output.metrics:q} {params.options}"
        " --probabilities-dir {params.probabilities:q}"
        " --threads {threads} 2> {log:q}"


rule segment_lesions:
    input:
        # ancient: when slides are added the model is retrained with their annotations, but the
        # slides already segmented keep their masks (and features) instead of starting over
        checkpoint=ancient(segmentation_checkpoint()),
        thumbnail=layout.slide_file("{slide}", layout.THUMBNAIL),
        tissue=layout.slide_file("{slide}", layout.TISSUE_MASK),
    output:
        layout.slide_file("{slide}", layout.LESION_MASK),
    params:
        probabilities=layout.segmentation_file("probabilities"),
    log:
        "logs/segment_lesions/{slide}.log",
    benchmark:
        "benchmarks/segment_lesions/{slide}.tsv"
    group:
        slide_group()
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil segment --checkpoint {input.checkpoint:q} --thumbnail {input.thumbnail:q}"
        " --tissue-mask {input.tissue:q} --slide-id {wildcards.slide:q} --out {output:q}"
        " --reuse {params.probabilities:q}"
        " --threads {threads} 2> {log:q}"
