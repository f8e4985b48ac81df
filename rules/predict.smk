# Trained experiments -> attention heatmaps of fold 0's test slides, and predictions on new slides.


# One job per experiment (not per slide): the fold's test slides are known only once
# folds.csv exists, and one process start (torch import) serves all of them.
rule draw_heatmaps:
    input:
        checkpoint=layout.fold_checkpoint("{experiment}", 0),
        bags=experiment_bags,
        thumbnails=all_thumbnails,
        folds=layout.folds_file(),
        sheet=SCREENED_SHEET,
    output:
        layout.heatmap_file("{experiment}", "summary.csv"),
    params:
        models=experiment_dir,
        features=experiment_features,
        out_dir=experiment_heatmap_dir,
        slides=layout.slides_root(),
        options=CFG.heatmap_options(),
    log:
        "logs/draw_heatmaps/{experiment}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil heatmap --models {params.models:q} --fold 0 --features {params.features:q}"
        " --sheet {input.sheet:q} --folds {input.folds:q} --slides-dir {params.slides:q}"
        " --out-dir {params.out_dir:q} {params.options} --threads {threads} 2> {log:q}"


rule predict_slides:
    input:
        unpack(predict_inputs),
        sheet=predict_sheet(),
    output:
        csv=layout.predictions_file("{experiment}", "predictions.csv"),
        json=layout.predictions_file("{experiment}", "predictions.json"),
    params:
        models=experiment_dir,
        out=predictions_dir,
        features=experiment_features,
        options=predict_options,
        results=results_folder,
    log:
        "logs/predict_slides/{experiment}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil predict --models {params.models:q} --sheet {input.sheet:q}"
        " --out {params.out:q} --results {params.results:q} --features {params.features:q}"
        " {params.options} --threads {threads} --no-progress 2> {log:q}"
