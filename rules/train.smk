# Folds, fold-wise training and evaluation (one job per experiment and fold).


rule make_splits:
    input:
        sheet=SCREENED_SHEET,
    output:
        # update(): the previous folds.csv is read so patients keep their fold as slides are added
        update("results/splits/{repeat}folds.csv"),
    params:
        options=splits_options,
    log:
        "logs/{repeat}make_splits.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil splits --sheet {input.sheet:q} --out {output:q} --previous {output:q} {params.options} 2> {log:q}"


rule train_fold:
    input:
        bags=experiment_bags,
        folds=experiment_folds,
        sheet=SCREENED_SHEET,
        init=init_checkpoint,
    output:
        checkpoint="results/models/{experiment}/{repeat}fold{fold}/checkpoint.pt",
        # the best checkpoint on the fold's test part (msamil evaluate's outputs, same process)
        metrics="results/models/{experiment}/{repeat}fold{fold}/metrics.json",
        predictions="results/models/{experiment}/{repeat}fold{fold}/predictions.csv",
    params:
        features=experiment_features,
        models=experiment_dir,
        options=train_options,
    log:
        "logs/train_fold/{experiment}/{repeat}fold{fold}.log",
    # MIL bags are small: one thread per job, and several jobs side by side, beat
    # oversubscribed OpenMP threads on a CPU by a factor of ten
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil train --features {params.features:q} --sheet {input.sheet:q} --folds {input.folds:q}"
        " --fold {wildcards.fold:q} --out {params.models:q} {params.options} --threads {threads} --evaluate 2> {log:q}"
