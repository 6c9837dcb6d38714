"""The ClientApp: the task's ordinary training loop, run on a GradGuard-wrapped model.

GradGuard's settings come from the run config (``gradguard.*`` keys in pyproject.toml, or
``flwr run --run-config``); ``gradguard_mod`` makes sure that what leaves the node is a
well-formed protected update.
"""
from gradguard.integrations.flower import gradguard_mod, guarded_client_app

from gradguard_flower_app import task

app = guarded_client_app(task.train, model_fn=task.build_model, optimizer_fn=task.build_optimizer,
                         mods=[gradguard_mod])
