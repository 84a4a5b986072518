# Shared test set-up. The machine that runs CI has two cores; one torch thread per test process
# keeps subprocess-heavy tests from oversubscribing them.
import torch

torch.set_num_threads(1)
