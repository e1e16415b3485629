"""Pre- and postprocessor plug-ins imported by path ('tests.plugins_example:...') in the tests:
what a user's own package would hold. docs/plugins.md shows this module's code (a unit test
keeps the two the same)."""

from __future__ import annotations

import numpy as np

from maas_ray.errors import ConfigError, InvalidInputError
from maas_ray.serving.plugins import Postprocessor, Preprocessor, RequestInput, TensorSpec, check_tensor


class CelsiusToFahrenheit(Preprocessor):
    """Requests send temperatures in Celsius under their own input name; the model was trained
    on Fahrenheit. Params: input_name (default "celsius")."""

    def __init__(self, manifest, params, *, limits=None, files=None):
        super().__init__(manifest, params, limits=limits, files=files)
        if len(self.inputs) != 1 or self.inputs[0].datatype != "FP32":
            raise ConfigError(f"CelsiusToFahrenheit needs one FP32 model input, {manifest.model} has {self.inputs}")
        self.feed = self.inputs[0]
        # What requests send: FP32 only, in the shape of the model's input.
        self.request = TensorSpec(name=self.params.get("input_name", "celsius"), datatype="FP32",
                                  shape=self.feed.shape)
        self.request_inputs = [RequestInput(self.request.name, ("FP32",), self.request.shape)]

    def __call__(self, tensors, *, strict_dtypes):
        # Names and (for v2 requests) datatypes were checked before this runs: shapes were not.
        # check_tensor checks the shape and casts v1's float64 numbers to float32.
        if self.request.name not in tensors:
            raise InvalidInputError(f"missing input {self.request.name!r}")
        celsius = check_tensor(self.request, tensors[self.request.name])
        if not np.isfinite(celsius).all():
            raise InvalidInputError(f"input {self.request.name!r}: temperatures must be finite")
        return {self.feed.name: celsius * np.float32(1.8) + np.float32(32)}


class Argmax(Postprocessor):
    """Adds the index of the largest score of each item (INT64) to the model's outputs.
    Params: output_name (default "argmax")."""

    def __init__(self, manifest, params, *, limits=None, files=None):
        super().__init__(manifest, params, limits=limits, files=files)
        self.scores = self.outputs[0].name
        self.output = self.params.get("output_name", "argmax")
        self.response_outputs = [*self.outputs, TensorSpec(name=self.output, datatype="INT64", shape=[-1])]

    def __call__(self, outputs):
        return {**outputs, self.output: np.argmax(outputs[self.scores], axis=-1).astype(np.int64)}
