"""The served model as MLflow's models-from-code: MLflow runs this file to build the pyfunc, so
loading a logged or registered model unpickles nothing (the weights are read by
``torch.load(weights_only=True)``, see :func:`trainers.model.load_tensors`)."""

import mlflow.models

from trainers.serving import QueryClassifierModel

mlflow.models.set_model(QueryClassifierModel())
