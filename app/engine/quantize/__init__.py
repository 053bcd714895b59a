"""EXL2 quantizer: calibration -> GPTQ measurement -> bpw optimization -> layer-by-layer conversion.

Public entry points: `convert` (fp16 folder -> EXL2 folder, resumable), `measure_model`,
`CalibrationSettings`, `load_measurement`, `optimize`.
"""

from .calibration import CalibrationSettings, calibration_rows
from .convert import ConvertResult, convert, measure_model
from .gptq import QuantizeError, QuantSpec, gptq_quantize
from .measure import HEAD_SPECS, SPECS, Measurement, load_measurement
from .optimize import Strategy, optimize

__all__ = ["HEAD_SPECS", "SPECS", "CalibrationSettings", "ConvertResult", "Measurement", "QuantSpec",
           "QuantizeError", "Strategy", "calibration_rows", "convert", "gptq_quantize", "load_measurement",
           "measure_model", "optimize"]
