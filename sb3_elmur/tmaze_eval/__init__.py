"""T-Maze evaluation at many corridor lengths, batched and in worker processes, and its command
(``python -m sb3_elmur.tmaze_eval``)."""

from sb3_elmur.tmaze_eval.evaluation import (
    EvaluationWorkerError,
    TMazeResult,
    check_tmaze_evaluation,
    evaluate_tmaze,
    evaluate_tmaze_corridors,
)
from sb3_elmur.tmaze_eval.cli import main

__all__ = ["EvaluationWorkerError", "TMazeResult", "check_tmaze_evaluation", "evaluate_tmaze", "evaluate_tmaze_corridors", "main"]
