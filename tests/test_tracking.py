"""MLflow logging: the sweep's experiment opens on MLflow 3's model-training view."""

from tscray.tracking import EXPERIMENT_KIND, Tracker


def test_experiment_is_tagged_for_the_model_training_view(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "s", "abc", str(tmp_path), {"name": "s"})
    exp = t.client.get_experiment(t.exp_id)
    assert exp.tags[EXPERIMENT_KIND] == "custom_model_development"
    # an experiment created by an older tscray (no tag) gets it on the next sweep
    t.client.delete_experiment_tag(t.exp_id, EXPERIMENT_KIND)
    again = Tracker(uri, "s", "abc", str(tmp_path), {"name": "s"})
    assert again.exp_id == t.exp_id and again.parent == t.parent
    assert again.client.get_experiment(t.exp_id).tags[EXPERIMENT_KIND] == "custom_model_development"
