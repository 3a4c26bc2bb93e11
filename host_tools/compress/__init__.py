"""Model compression on the host, every result checked against the original.

    report = run_recipe(ModelFile.open("model.onnx"), load_recipe("int8-static", "onnx"),
                        calib="calib.npz", eval_data="heldout.npz", out=Path("model.int8.onnx"))

Passes (one technique each, typed config, registered by name) live in backend folders:
``onnx/``, ``tflite/``, ``torch/``; a recipe is an ordered list of them.
"""

from host_tools.compress.data import Dataset, load_dataset
from host_tools.compress.model import ModelFile
from host_tools.compress.passes import Pass, PassConfig, all_passes, get_pass, register
from host_tools.compress.recipes import NAMED as NAMED_RECIPES
from host_tools.compress.recipes import Recipe, Step, load_recipe
from host_tools.compress.workflow import CompressionReport, Measured, run_recipe

__all__ = ["NAMED_RECIPES", "CompressionReport", "Dataset", "Measured", "ModelFile", "Pass", "PassConfig",
           "Recipe", "Step", "all_passes", "get_pass", "load_dataset", "load_recipe", "register", "run_recipe"]
