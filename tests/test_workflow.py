"""The Snakefile end to end on a tiny BERT and real BBC News articles, then what reruns when the
config changes (dry runs against the finished results)."""

from __future__ import annotations

import base64
import copy
import json
import re
import sqlite3

import pandas as pd
import pytest

from .conftest import PARALLEL, Workflow, tiny_config

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, tiny_bert_dir) -> Workflow:
    config = tiny_config(tiny_bert_dir)
    config["train"]["seeds"] = [0, 1]
    flow = Workflow(tmp_path_factory.mktemp("workflow"), config)
    flow.run(*PARALLEL)  # four finetune jobs at once write to one new SQLite store
    return flow


@pytest.fixture
def changed(workflow):
    """Change the config for one test; the original comes back afterwards."""
    original = workflow.config

    def change(edit):
        config = workflow.config
        edit(config)
        workflow.write_config(config)
        return workflow.dry_run_jobs()

    yield change
    workflow.write_config(original)


def dry_run_jobs(flow: Workflow) -> dict[str, int]:
    return flow.dry_run_jobs()


def test_leaderboard_has_every_run_with_real_metrics(workflow):
    report = workflow.results("tiny") / "report"
    board = pd.read_csv(report / "leaderboard.csv")
    assert sorted(zip(board["strategy"], board["seed"], strict=True)) == [
        ("full", 0),
        ("full", 1),
        ("head_only", 0),
        ("head_only", 1),
        ("tfidf_logreg", 0),
    ]
    for column in ("test_accuracy", "test_macro_f1"):
        assert board[column].between(0, 1).all()
    tuned = board["strategy"] != "tfidf_logreg"
    assert board.loc[tuned, "trainable_fraction"].between(0, 1).all()
    assert board.loc[~tuned, "trainable_fraction"].isna().all()  # the baseline tunes nothing
    assert (board["test_examples"] == 426).all()  # 20% of the 2,127 distinct articles
    head_only = board[board["strategy"] == "head_only"]
    assert (head_only["trainable_params"] == 32 * 5 + 5).all()
    assert (board.loc[board["strategy"] == "full", "trainable_fraction"] == 1.0).all()
    assert "± " in (report / "leaderboard.md").read_text()
    assert (report / "leaderboard.png").stat().st_size > 10_000
    assert (report / "tradeoffs.png").stat().st_size > 10_000
    best = pd.read_csv(report / "best_per_shots.csv")
    on_val = board.groupby("strategy")["best_val_macro_f1"].mean()
    assert on_val[best.loc[0, "selected_strategy"]] == on_val.max()  # validation, never test
    assert (workflow.root / best.loc[0, "model_dir"] / "config.json").is_file()
    assert "<table>" in (report / "leaderboard.html").read_text()
    assert (report / "curves.png").stat().st_size > 10_000


def test_every_stage_wrote_its_outputs_logs_and_benchmarks(workflow):
    results = workflow.results("tiny")
    info = json.loads((results / "data/data.json").read_text())
    assert info["num_labels"] == 5 and len(info["fingerprint"]) == 64
    few = pd.read_parquet(results / "data/train_k4.parquet")
    assert few["label"].value_counts().eq(4).all()
    scores = pd.read_parquet(results / "importance/k4/random/scores.parquet")
    assert set(scores["layer"]) == {"input", "block01", "block02", "output", "head"}
    assert (results / "importance/k4/random/heatmap.png").stat().st_size > 10_000
    agreement = pd.read_csv(results / "importance/k4/random/agreement.csv", index_col=0)
    assert {"grad_norm", "fisher", "hessian_trace", "combined"} <= set(agreement.columns)
    assert (results / "plans/k4/full.png").stat().st_size > 10_000
    plan = json.loads((results / "plans/k4/head_only.json").read_text())
    assert [t["name"] for t in plan["tensors"] if not t["frozen"]] == [
        "classifier.weight",
        "classifier.bias",
    ]
    run = results / "runs/full/k4/seed0"
    assert (run / "model/model.safetensors").is_file()
    assert len(pd.read_csv(run / "history.csv")) == 1
    assert (run / "confusion.png").stat().st_size > 5_000
    for rule in ("prepare_data", "score_importance", "finetune", "evaluate", "report"):
        assert list((results / "benchmarks").rglob(f"{rule}*")), rule
        assert list((results / "logs").rglob(f"{rule}*")), rule


def test_jobs_ran_in_the_worker_which_stopped_with_the_workflow(workflow):
    """adaptune's worker served the jobs that came once it listened (those before it ran in
    their own processes: it was still importing), refused none, and ended with snakemake."""
    results = workflow.results("tiny")
    served = (results / "logs/worker.log").read_text()
    assert "listening on" in served and served.rstrip().endswith("stopped"), served
    assert "in its own process" not in served, served
    ran_there = [
        log
        for log in (results / "logs").rglob("*.log")
        if "adaptune worker: the job ran in process" in log.read_text()
    ]
    assert ran_there and len(ran_there) == served.count(": process "), served


def test_mlflow_has_one_run_per_job_with_params_metrics_and_artifacts(workflow):
    import mlflow

    db = workflow.root / "results/mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'finetune'")
    assert len(runs) == 4
    baseline = client.search_runs([experiment.experiment_id], "tags.stage = 'baseline'")
    assert len(baseline) == 1 and "test_macro_f1" in baseline[0].data.metrics
    for run in runs:
        assert run.info.status == "FINISHED"
        params, metrics = run.data.params, run.data.metrics
        assert {
            "model",
            "optimizer",
            "lr",
            "epochs",
            "batch_size",
            "shots",
            "seed",
            "strategy",
            "trainable_fraction",
        } <= set(params)
        assert {"test_accuracy", "test_macro_f1", "val_macro_f1", "train_loss"} <= set(metrics)
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"head_only.json", "full.json"} & artifacts and "history.csv" in artifacts
        importance = {a.path for a in client.list_artifacts(run.info.run_id, "importance")}
        assert importance == {
            "importance/scores.parquet",
            "importance/layers.parquet",
            "importance/heatmap.png",
            "importance/head.json",
        }
        evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert "evaluation/confusion.png" in evaluation
    connection = sqlite3.connect(db)
    assert connection.execute("select count(*) from runs").fetchone()[0] == 5


def test_each_mlflow_run_is_complete_and_the_selected_model_is_registered(workflow):
    """The run record a user inspects: what ran (device, strategy and data settings, the
    resolved config), per-step curves, the data as a dataset input, the model logged with its
    flavor, and the validation-selected run registered as ``champion``."""
    import mlflow

    tracking_uri = f"sqlite:///{workflow.root / 'results/mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run_id = (workflow.results("tiny") / "runs/full/k4/seed0/mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert params["device"] == "cpu" and params["data.seed"] == "0"
    assert params["importance.batches"] == str(workflow.config["importance"]["batches"])
    assert tags["adaptune.group"] == "full/k4" and "mlflow.note.content" in tags
    assert tags["mlflow.source.name"].startswith("snakemake rule finetune")
    config = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config.json")
    assert config["strategy"] == {"name": "full", "kind": "full"} and config["data"]["shots"] == "4"
    steps = client.get_metric_history(run_id, "train_loss_step")
    assert [m.step for m in steps] == list(range(1, len(steps) + 1)) and len(steps) == 3
    rates = [m.value for m in client.get_metric_history(run_id, "lr")]
    assert rates[0] > 0 and len(rates) == 3  # the rate each step used, not the one after it
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"train", "validation"}
    from adaptune.tracking import logged_model_uri

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)  # models:/ URIs resolve through the global store
    try:
        logged = mlflow.pyfunc.load_model(logged_model_uri(tracking_uri, run_id))
        predicted = logged.predict(["a short text about the markets"])
    finally:
        mlflow.set_tracking_uri(previous)
    assert logged.metadata.flavors.keys() >= {"transformers", "python_function"}
    assert set(predicted["label"]) <= set(
        json.loads((workflow.results("tiny") / "data/data.json").read_text())["labels"]
    )
    best = pd.read_csv(workflow.results("tiny") / "report/best_per_shots.csv").loc[0]
    champion = client.get_model_version_by_alias("tiny-k4", "champion")
    selected = f"runs/{best['model_strategy']}/k4/seed{best['model_seed']}/mlflow_run_id"
    assert champion.run_id == (workflow.results("tiny") / selected).read_text().strip()


def test_a_second_run_has_nothing_to_do(workflow):
    assert dry_run_jobs(workflow) == {}


def test_changing_the_learning_rate_reruns_only_training_and_after(changed):
    jobs = changed(lambda c: c["train"].update(lr=1e-4))
    assert jobs == {"finetune": 4, "evaluate": 4, "report": 1, "all": 1}


def test_a_strategy_override_reruns_only_that_strategy(changed):
    jobs = changed(lambda c: c["strategies"]["head_only"]["train"].update(lr=5e-3))
    assert jobs == {"finetune": 2, "evaluate": 2, "report": 1, "all": 1}


def test_changing_importance_does_not_rerun_data_preparation(changed):
    jobs = changed(lambda c: c["importance"].update(batches=2))
    assert jobs == {
        "score_importance": 1,
        "make_freeze_plan": 2,
        "finetune": 4,
        "evaluate": 4,
        "report": 1,
        "all": 1,
    }


def test_a_new_shot_count_only_adds_its_jobs(changed):
    jobs = changed(lambda c: c["data"].update(shots=[4, 8]))
    assert jobs == {
        "fit_baseline": 1,
        "sample_few_shot": 2,  # its training and validation samples
        "score_importance": 1,
        "make_freeze_plan": 2,
        "finetune": 4,
        "evaluate": 4,
        "report": 1,
        "all": 1,
    }


def test_a_new_seed_only_adds_its_runs(changed):
    jobs = changed(lambda c: c["train"].update(seeds=[0, 1, 2]))
    assert jobs == {"finetune": 2, "evaluate": 2, "report": 1, "all": 1}


def test_changing_the_data_split_reruns_everything_downstream(changed):
    jobs = changed(lambda c: c["data"].update(val_size=0.15))
    assert jobs["prepare_data"] == 1 and jobs["finetune"] == 4


def test_rerunning_evaluate_logs_into_the_same_mlflow_run(workflow):
    import mlflow

    # one evaluate job again (forcing all four cost 48 s of the suite for the same check)
    workflow.run("--cores", "2", "--force", "results/tiny/runs/full/k4/seed1/metrics.json")
    client = mlflow.MlflowClient(f"sqlite:///{workflow.root / 'results/mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([experiment], "tags.stage = 'finetune'")
    assert len(runs) == 4
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "test_accuracy")
        again = run.data.params["strategy"] == "full" and run.data.params["seed"] == "1"
        assert len(history) == (2 if again else 1)
        assert history[0].value == history[-1].value


def test_a_config_error_names_the_key(changed, workflow):
    config = workflow.config
    config["train"]["optimizer"] = "lion"
    workflow.write_config(config)
    result = workflow.run("-n", check=False)
    assert result.returncode != 0
    assert "lion" in result.stderr + result.stdout and "optimizer" in result.stderr + result.stdout


def test_bad_data_stops_with_a_message_naming_the_column(tmp_path, tiny_bert_dir, bbc_sample_csv):
    config = tiny_config(tiny_bert_dir, experiment="bad", source=f"csv:{bbc_sample_csv}")
    flow = Workflow(tmp_path, config)
    result = flow.run("--cores", "1", "results/bad/data/data.json", check=False)
    assert result.returncode != 0
    log = (flow.results("bad") / "logs/prepare_data.log").read_text()
    assert "no column(s) ['text', 'label']" in log and "'body', 'topic'" in log
    assert not (flow.results("bad") / "data/data.json").exists()


def test_snakemake_report_has_the_plots_with_captions(workflow):
    workflow.run("--report", "report.html")
    html = (workflow.root / "report.html").read_text(errors="replace")
    assert "Quality against cost" in html and "Freeze plan" in html
    assert "Confusion matrix on the test split" in html


def test_the_report_of_an_experiment_given_with_configfile_stands_alone(changed, workflow):
    """``--report`` for a ``--configfile`` experiment while config/config.yaml names another
    (whose results do not exist): the headline, tables and curves of the one asked for."""
    other = workflow.root / "other.yaml"
    other.write_text((workflow.root / "config/config.yaml").read_text())
    changed(lambda c: c.update(experiment="never-run"))
    result = workflow.run("--configfile", "other.yaml", "--report", "other.html")
    assert "Report created" in result.stdout + result.stderr
    html = (workflow.root / "other.html").read_text(errors="replace")
    embedded = dict(
        re.findall(r'"data_uri": "data:[^;]*;charset=utf8;filename=([^;]+);base64,([^"]+)"', html)
    )
    page = base64.b64decode(embedded["leaderboard.html"]).decode()
    for text in ("selected on validation", "Every run", "tfidf_logreg", "<table>", "Config"):
        assert text in page, text
    assert "Validation macro-F1 (left)" in html  # the curves' caption


def test_a_combined_layer_plan_follows_the_weighted_layer_scores(tmp_path, tiny_bert_dir):
    """With ``importance.combine`` set, make_freeze_plan ranks layers by the weighted combined
    score that score_importance wrote to layers.parquet (and drew in the heatmap), not by an
    equal-weight recomputation from the tensor scores."""
    config = tiny_config(tiny_bert_dir, experiment="combine")
    config["importance"].update(
        metrics=["weight_l1", "depth", "combined"], combine={"weight_l1": 1, "depth": 0.01}
    )
    config["strategies"] = {
        "freeze": {"kind": "importance", "metric": "combined", "freeze": {"fraction": 0.5}}
    }
    flow = Workflow(tmp_path, config)
    flow.run("--cores", "2", "--until", "make_freeze_plan")
    results = flow.results("combine")
    layers = pd.read_parquet(results / "importance/k4/random/layers.parquet")
    body = layers[layers["layer_kind"] != "head"].sort_values("combined_per_element")
    # Weight norms dominate the weighted ranks: the output layer is the least important, then
    # the input layer (with equal weights, depth would put the input layer first, alone).
    assert body["layer"].tolist()[:2] == ["output", "input"]
    plan = json.loads((results / "plans/k4/freeze.json").read_text())
    frozen = {t["layer"] for t in plan["tensors"] if t["frozen"]}
    expected, count = set(), 0
    target = 0.5 * body["numel"].sum()
    for row in body.itertuples():
        if count >= target:
            break
        expected.add(row.layer)
        count += row.numel
    assert frozen == expected


def test_the_saved_model_predicts_with_transformers_pipeline_as_evaluate_scored_it(workflow):
    """The model folder stands alone: ``transformers.pipeline`` loads it with its own tokenizer
    and reproduces, on the test split, the accuracy ``evaluate`` reported. (With the blank
    tokenizer transformers builds when none is saved, every word is [UNK] and it does not.)"""
    from transformers import pipeline

    run = workflow.results("tiny") / "runs/full/k4/seed0"
    assert (run / "model/tokenizer.json").is_file()
    test = pd.read_parquet(workflow.results("tiny") / "data/test.parquet")
    classify = pipeline("text-classification", model=str(run / "model"), device="cpu")
    predicted = [p["label"] for p in classify(test["text"].tolist(), truncation=True)]
    accuracy = (pd.Series(predicted) == test["label"].to_numpy()).mean()
    reported = json.loads((run / "metrics.json").read_text())["test_accuracy"]
    assert accuracy == pytest.approx(reported, abs=1e-9)


def test_adaptune_predict_writes_probabilities_that_reproduce_the_test_accuracy(
    workflow, tmp_path, capsys
):
    from adaptune.cli import main

    results = workflow.results("tiny")
    test = pd.read_parquet(results / "data/test.parquet")
    new = tmp_path / "new.csv"
    test[["text"]].assign(id=test["example_id"]).to_csv(new, index=False)
    out = tmp_path / "predictions.csv"
    model = results / "runs/head_only/k4/seed0/model"
    assert main(["predict", str(model), str(new), "-o", str(out)]) == 0
    predictions = pd.read_csv(out)
    labels = json.loads((results / "data/data.json").read_text())["labels"]
    assert list(predictions.columns) == ["id", "predicted", "probability"] + [
        f"p_{label}" for label in labels
    ]
    assert (predictions["id"] == test["example_id"]).all()
    probabilities = predictions[[f"p_{label}" for label in labels]]
    assert probabilities.sum(axis=1).round(5).eq(1).all()
    accuracy = (predictions["predicted"] == test["label"].to_numpy()).mean()
    reported = json.loads((model.parent / "metrics.json").read_text())["test_accuracy"]
    assert accuracy == pytest.approx(reported, abs=1e-9)
    assert main(["predict", str(model), str(tmp_path / "missing.csv")]) == 1
    assert "missing.csv: no such file" in capsys.readouterr().err


@pytest.mark.slow  # a workflow of its own (1 min) for the probe head's branch
def test_each_strategy_plans_from_the_scores_of_its_head(tmp_path, tiny_bert_dir):
    """One score_importance job per head a strategy uses: an importance strategy with
    ``head: probe`` plans from (and trains with) the probed head's scores, the others from the
    random head's (importance.head); the probe's settings rerun the probe branch alone."""
    from adaptune import strategies
    from adaptune.plans import Plan, ScoreTables

    config = tiny_config(tiny_bert_dir, experiment="heads")
    config["importance"].update(metrics=["weight_l2", "grad_norm", "fisher"], probe_epochs=2)
    freeze = {"kind": "importance", "metric": "fisher", "freeze": {"fraction": 0.5}}
    config["strategies"] = {
        "full": {"kind": "full"},
        "freeze_random": freeze,
        "freeze_probe": {**freeze, "head": "probe"},
    }
    flow = Workflow(tmp_path, config)
    flow.run("--cores", "2", "--until", "make_freeze_plan")
    importance = flow.results("heads") / "importance/k4"
    assert sorted(p.name for p in importance.iterdir()) == ["probe", "random"]
    assert json.loads((importance / "random/head.json").read_text()) == {"head": "random"}
    probed = json.loads((importance / "probe/head.json").read_text())
    assert probed["head"] == "probe" and probed["probe_epochs"] == 2
    assert probed["probe_seconds"] > 0 and 0 <= probed["train_accuracy"] <= 1

    tables = {
        head: ScoreTables.read(
            importance / head / "scores.parquet", importance / head / "layers.parquet"
        )
        for head in ("random", "probe")
    }
    head_rows = tables["random"].tensors["is_head"]
    # The probe moved the head: its weights' norms differ, the body's do not.
    random_l2, probe_l2 = (tables[h].tensors["weight_l2"] for h in ("random", "probe"))
    assert (random_l2[head_rows] != probe_l2[head_rows]).all()
    assert (random_l2[~head_rows] == probe_l2[~head_rows]).all()
    for name, head in (("freeze_random", "random"), ("freeze_probe", "probe")):
        plan = Plan.load(flow.results("heads") / f"plans/k4/{name}.json")
        other = "probe" if head == "random" else "random"
        assert plan.tensors == strategies.build_plan(tables[head], name, freeze).tensors
        assert plan.tensors != strategies.build_plan(tables[other], name, freeze).tensors

    # finetune reads, and logs, the scores of its strategy's head.
    planned = re.split(r"^rule ", flow.run("-n", "--until", "finetune").stdout, flags=re.M)
    finetune_inputs = {
        re.search(r"strategy=([\w-]+),", job).group(1): re.search(r"input: ([^\n]*)", job).group(1)
        for job in planned
        if job.startswith("finetune:")
    }
    for name, head in (("full", "random"), ("freeze_random", "random"), ("freeze_probe", "probe")):
        for file in ("scores.parquet", "head.json"):
            assert f"importance/k4/{head}/{file}" in finetune_inputs[name], name

    def rerun(edit):
        edited = copy.deepcopy(config)
        edit(edited)
        flow.write_config(edited)
        return flow.dry_run_jobs("--until", "make_freeze_plan")

    probe_branch = {"score_importance": 1, "make_freeze_plan": 1}
    assert rerun(lambda c: c["importance"].update(probe_epochs=3)) == probe_branch
    assert rerun(lambda c: c["importance"].update(probe_lr=0.1)) == probe_branch
    both = {"score_importance": 2, "make_freeze_plan": 3}
    assert rerun(lambda c: c["importance"].update(batches=2)) == both
    # Naming the head importance.head already gives changes nothing; importance.head: probe
    # moves every strategy without a head of its own onto the (up-to-date) probe scores.
    assert rerun(lambda c: c["strategies"]["freeze_random"].update(head="random")) == {}
    assert rerun(lambda c: c["importance"].update(head="probe")) == {"make_freeze_plan": 2}
