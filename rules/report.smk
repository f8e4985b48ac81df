# Fold metrics of every experiment -> the report.


rule make_report:
    input:
        metrics=fold_outputs("metrics.json"),
        predictions=fold_outputs("predictions.csv"),
        segmentation=segmentation_metrics(),
        heatmaps=heatmap_summaries(),
        k_studies=e2e_report_inputs(),
        left_out=LEFT_OUT,
    output:
        html="results/report/index.html",
        summary="results/report/summary.csv",
    params:
        options=report_options(),
    log:
        "logs/make_report.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/msamil.yaml"
    shell:
        "msamil report {params.options} --benchmarks benchmarks --out-dir results/report 2> {log:q}"
