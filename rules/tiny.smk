# The tiny world: a corpus of text that ships with the machine, tokenizers trained on it, small
# pretrained base models of every family the recipes use, and data sets in the real formats.


rule tiny_corpus:
    output:
        directory(f"{TW}/data/tiny_text"),
    log:
        f"{TW}/logs/tiny_corpus.log",
    benchmark:
        f"{TW}/benchmarks/tiny_corpus.tsv"
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        pydoc="--pydoc" if CFG["tiny_world"]["corpus"]["pydoc_topics"] else "",
        fortunes=CFG["tiny_world"]["corpus"]["fortunes_zh"],
        heldout=CFG["tiny_world"]["corpus"]["heldout_fraction"],
        validation=CFG["tiny_world"]["corpus"]["validation_fraction"],
    shell:
        "python -m quantune.tiny_world corpus --out {output} {params.pydoc} --fortunes {params.fortunes}"
        " --heldout {params.heldout} --validation {params.validation} > {log} 2>&1"


rule tiny_dataset:
    output:
        directory(f"{TW}/data/{{kind}}"),
    log:
        f"{TW}/logs/tiny_dataset_{{kind}}.log",
    benchmark:
        f"{TW}/benchmarks/tiny_dataset_{{kind}}.tsv"
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        n=lambda w: CFG["tiny_data"][w.kind],
        seed=CFG["tiny_data"]["seed"],
    shell:
        "python -m quantune.tiny_world dataset {wildcards.kind} --out {output} --train {params.n[train]}"
        " --validation {params.n[validation]} --test {params.n[test]} --seed {params.seed} > {log} 2>&1"


rule tiny_tokenizer:
    input:
        rules.tiny_corpus.output,
    output:
        directory(f"{TW}/tokenizers/{{tok}}"),
    log:
        f"{TW}/logs/tiny_tokenizer_{{tok}}.log",
    benchmark:
        f"{TW}/benchmarks/tiny_tokenizer_{{tok}}.tsv"
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        vocab=CFG["tiny_world"]["tokenizer"]["vocab_size"],
        minf=CFG["tiny_world"]["tokenizer"]["min_frequency"],
    shell:
        "python -m quantune.tiny_world tokenizer --kind {wildcards.tok} --corpus {input} --out {output}"
        " --vocab-size {params.vocab} --min-frequency {params.minf} > {log} 2>&1"


rule tiny_pretrain:
    input:
        tokenizer=lambda w: f"{TW}/tokenizers/{TOKENIZER_OF_FAMILY[w.family]}",
        corpus=rules.tiny_corpus.output,
    output:
        directory(f"{TW}/models/{{family}}"),
    log:
        f"{TW}/logs/tiny_pretrain_{{family}}.log",
    benchmark:
        f"{TW}/benchmarks/tiny_pretrain_{{family}}.tsv"
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    threads: 2
    resources:
        mem_mb=4000,
        # minutes: 300 steps took ~1 min on 2 idle cores, 2400 ~16 min; 20x headroom for loaded machines
        runtime=lambda w: max(60, pretrain_settings(CFG, w.family)["steps"] // 20),
    params:
        spec=lambda w: json.dumps(
            {
                "family": CFG["tiny_world"]["families"][w.family],
                "pretrain": pretrain_settings(CFG, w.family),
            },
            sort_keys=True,
        ),
    # exec: SIGTERM (SLURM's time limit, preemption) reaches the trainer: it checkpoints, exits 143, the rerun resumes
    shell:
        "OMP_NUM_THREADS={threads} exec python -m quantune.tiny_world pretrain --family {wildcards.family}"
        " --tokenizer {input.tokenizer} --corpus {input.corpus} --out {output} --spec-json {params.spec:q}"
        " > {log} 2>&1"


rule tiny_world:
    input:
        models=expand(f"{TW}/models/{{family}}", family=sorted(CFG["tiny_world"]["families"])),
        tokenizers=expand(f"{TW}/tokenizers/{{tok}}", tok=["bpe", "spm"]),
        data=expand(f"{TW}/data/{{kind}}", kind=["advertisegen", "alpaca", "summary_pref", "tiny_text"]),
    output:
        report(
            f"{TW}/metrics.json",
            caption="../report/tiny_world.rst",
            category="metrics",
            labels={"target": "tiny_world"},
        ),
    log:
        f"{TW}/logs/tiny_world.log",
    benchmark:
        f"{TW}/benchmarks/tiny_world.tsv"
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m quantune.tiny_world summary --models {input.models} --tokenizers {input.tokenizers}"
        " --data {input.data} --out {output} > {log} 2>&1"
