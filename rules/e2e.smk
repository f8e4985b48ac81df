# End-to-end training of encoder + MIL per fold, re-extraction with each fold's tuned encoder,
# and the K study (MsaMIL-Net sec. 3.4; Campanella et al.).


rule train_e2e:
    input:
        coords=all_coords,
        folds=layout.folds_file(),
        sheet=SCREENED_SHEET,
    output:
        layout.e2e_checkpoint("{e2e}", "{fold}"),
    params:
        out=e2e_run_dir,
        coords=layout.coords_dir(CFG.strategy, CFG.strategy),
        options=e2e_options,
    log:
        "logs/train_e2e/{e2e}/fold{fold}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=1440,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil e2e --sheet {input.sheet:q} --folds {input.folds:q} --fold {wildcards.fold:q}"
        " --coords-dir {params.coords:q} --out {params.out:q} {params.options} --threads {threads} 2> {log:q}"


rule extract_e2e_features:
    input:
        slide=slide_file,
        coords=slide_coords(),
        checkpoint=layout.e2e_checkpoint("{e2e}", "{fold}"),
    output:
        layout.bag_file(layout.e2e_feature_set("{e2e}", "{fold}"), "{slide}"),
    params:
        path=slide_path,
        options=extract_e2e_options,
    log:
        "logs/extract_e2e_features/{e2e}/fold{fold}/{slide}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil extract --slide {params.path:q} --slide-id {wildcards.slide:q} {params.options}"
        " --coords {input.coords:q} --out {output:q} --encoder-checkpoint {input.checkpoint:q}"
        " --threads {threads} --no-progress 2> {log:q}"


rule run_k_study:
    input:
        coords=all_coords,
        folds=layout.folds_file(),
        sheet=SCREENED_SHEET,
    output:
        curves=layout.e2e_file("{e2e}", "k_study.csv"),
        summary=layout.e2e_file("{e2e}", "k_study_summary.csv"),
        png=layout.e2e_file("{e2e}", "k_study.png"),
    params:
        out=e2e_run_dir,
        coords=layout.coords_dir(CFG.strategy, CFG.strategy),
        options=k_study_options,
    log:
        "logs/run_k_study/{e2e}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=1440,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil e2e --sheet {input.sheet:q} --folds {input.folds:q} --fold 0"
        " --coords-dir {params.coords:q} --out {params.out:q} {params.options} --threads {threads} --no-progress 2> {log:q}"
