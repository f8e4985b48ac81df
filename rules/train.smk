# Folds, fold-wise training and evaluation (one job per experiment and fold).


rule make_splits:
    input:
        sheet=SCREENED_SHEET,
    output:
        # update(): the previous folds.csv is read so patients keep their fold as slides are added
        update(layout.folds_file("{repeat}")),
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
        checkpoint=layout.fold_checkpoint("{experiment}", "{fold}", "{repeat}"),
        # the best checkpoint on the fold's test part (msamil evaluate's outputs, same process)
        metrics=layout.fold_file("{experiment}", "{fold}", "{repeat}", "metrics.json"),
        predictions=layout.fold_file("{experiment}", "{fold}", "{repeat}", "predictions.csv"),
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


# The experiment's manifest: everything its models' inputs depend on (SPEC "Outputs"), checked
# against every fold's checkpoint; predict and the report read it. A changed relation (ablation_of,
# ...) rewrites it without retraining. A few seconds on the machine that runs Snakemake (a local
# rule: no cluster job for it).
rule write_manifest:
    input:
        checkpoints=experiment_checkpoints,
        segmentation=manifest_segmentation,
    output:
        layout.manifest_file("{experiment}"),
    params:
        settings=manifest_settings,
    log:
        "logs/write_manifest/{experiment}.log",
    localrule: True
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil manifest --settings {params.settings} --checkpoints {input.checkpoints:q} --out {output:q} 2> {log:q}"
