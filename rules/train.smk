# Folds, fold-wise training and evaluation (one job per experiment and fold).


rule make_splits:
    input:
        sheet=sheet_file(),
    output:
        # update(): the previous folds.csv is read so patients keep their fold as slides are added
        update("results/splits/folds.csv"),
    params:
        n_folds=config["splits"]["n_folds"],
        seed=config["splits"]["seed"],
    log:
        "logs/make_splits.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil splits --sheet {input.sheet:q} --out {output:q} --previous {output:q}"
        " --folds {params.n_folds} --seed {params.seed} 2> {log:q}"


rule train_fold:
    input:
        bags=experiment_bags,
        folds="results/splits/folds.csv",
        sheet=sheet_file(),
        init=init_checkpoint,
    output:
        checkpoint="results/models/{experiment}/fold{fold}/checkpoint.pt",
        # the best checkpoint on the fold's test part (msamil evaluate's outputs, same process)
        metrics="results/models/{experiment}/fold{fold}/metrics.json",
        predictions="results/models/{experiment}/fold{fold}/predictions.csv",
    params:
        features=experiment_features,
        experiment=experiment_json,
        splits=split_options(),
        classes=class_options(),
    log:
        "logs/train_fold/{experiment}/fold{fold}.log",
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
        " --fold {wildcards.fold} --out results/models/{wildcards.experiment} {params.splits} {params.classes}"
        " --experiment {params.experiment:q} --threads {threads} --evaluate 2> {log:q}"
