"""I-LoRA (Ren et al. 2024, arXiv 2402.18865; official code which47/LLMCL `method/ILORA.py`): dual-memory
experience replay on LoRA, plus the task mechanism of sequential training.

Two LoRA adapters on the same frozen base, in one `ILoraLinear` per target (default q, k, v, o):
- fast learner: `lora_A` / `lora_B` (trained, PEFT's layout);
- slow learner: buffers `slow_lora_A` / `slow_lora_B` (saved, not trained), updated after every optimizer
  step by EMA interpolation (`ILoraModel.after_optimizer_step`):
      slow <- a slow + (1 - a) fast,   a = min(1 - 1 / (step + 1), ema_alpha)
  so step 0 copies the fast learner (a = 0). `ema_alpha` 0.99 by default; the official code uses 0.25.

Training step (`ReplayModel.forward` of `adapters/replay.py`, with I-LoRA's replay terms; the trainer only calls
`model(**batch)` and `model.after_optimizer_step()`):
1. draw a replay batch of the same size as the current one from the buffer (rule below);
2. add the current batch to the buffer (reservoir sampling, `replay_capacity` examples, CPU token tensors);
3. loss = (CE(current) + CE(replay)) / 2 + gamma L_cons, gamma = `consistency_weight`, with
   L_cons = mean over layers, tokens and channels of (H_fast - max(H_fast, H_slow))^2 on the replay batch:
   H are the decoder layers' outputs (`hidden_states[1:]`; the embedding output is the same for both
   learners and would only dilute the mean), padding excluded; H_slow under no_grad, without LoRA dropout.
   Only entries where the fast state is below the slow one are penalised, as the official code does.
   With nothing to replay, loss = CE(current) (the official first task).

Replay rule (`replay_from`):
- "seen" (default): any example added at an earlier step, of any task so far. Replay starts at the second
  step; the current batch never replays itself. In single-stage training (no `start_task` call) the buffer
  holds only the current task's data: I-LoRA then regularises towards its own EMA on that task, which is
  what results must say. (The official buffer also fills with current-task data but replays only after
  the first task.)
- "previous_tasks": only examples of tasks before the current one (the paper's continual setting); no
  replay during the first task. Call `model.start_task()` between tasks.
When fewer eligible examples than the batch size are stored, the replay batch is drawn with replacement.

Evaluation: in eval mode the layers use the slow learner (`eval_with="slow"`, the paper) or the fast one.
`merge_and_unload` is allowed and folds the `eval_with` learner (slow by default) into the base weights.
The replay buffer is training state: it is not saved with the adapter (save/load keeps both learners and
the EMA step count).
"""

from ...registry import MethodSpec
from .config import ILoraConfig
from .layer import ILoraLinear, inject_ilora
from .model import ILoraModel

SPEC = MethodSpec(name="ilora", config_class=ILoraConfig, peft_type="ILORA", inject=inject_ilora,
                  model_class=ILoraModel)

__all__ = ["SPEC", "ILoraConfig", "ILoraLinear", "ILoraModel"]
