# Fold metrics of every experiment -> the report.


rule make_report:
    input:
        metrics=fold_outputs("metrics.json"),
        predictions=fold_outputs("predictions.csv"),
        segmentation=segmentation_metrics(),
        heatmaps=heatmap_summaries(),
        k_studies=e2e_report_inputs(),
        manifests=manifests(),
        left_out=LEFT_OUT,
        folds=layout.folds_file(),
    output:
        html=layout.report_file("index.html"),
        summary=layout.report_file("summary.csv"),
    params:
        options=report_options(),
        config_files=config_file_options,
        out=report_folder,
    log:
        "logs/make_report.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil report {params.options} --folds {input.folds:q} {params.config_files} --benchmarks benchmarks "
        "--out-dir {params.out:q} 2> {log:q}"
