# One step of a stage: `python -m quantune.<step> --recipe R --out results/<target> --job-json J` under GPU_RUN
# (the GPUs the job holds; none with gpu=0), its output atomic, its log and benchmark per target. Every stage's
# rule is this one with its own inputs, env, resources and step (`use rule stage_step as <rule> with:`).
rule stage_step:
    input:
        recipe=lambda w: recipe_path(w.name),
    output:
        report(
            f"{RES}/{{name}}/metrics.json",
            caption="../report/metrics.rst",
            category="metrics",
            labels={"target": "{name}"},
        ),
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="no-recipes",
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    threads: 2
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    params:
        step="evaluate",
        extra="",
        out=lambda w: f"{RES}/{w.name}",
        job=lambda w: job_json(w.name),
    shell:
        "export OMP_NUM_THREADS={threads}; "
        + GPU_RUN
        + "python -m quantune.{params.step} --recipe {input.recipe} --out {params.out} {params.extra}"
        " --job-json {params.job:q} > {log} 2>&1"
