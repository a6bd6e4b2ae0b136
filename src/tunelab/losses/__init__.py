"""Loss functions as pure tensor functions (this package imports nothing from tunelab).

Every loss returns the SUM over its targets together with the number of targets, so the trainer can
normalise by the targets of the whole accumulated batch (batch 8 == 4 x 2 accumulation); the preference
losses return the unreduced loss of each pair with the rewards to report (see losses/preference.py), and GRPO's
the unreduced loss of each completion token (losses/grpo.py).
"""

from tunelab.losses.cross_entropy import (chunked_cross_entropy, chunked_lm_loss, chunked_token_lm_loss,
                                          classification_loss, span_loss, token_loss)
from tunelab.losses.grpo import (GRPOOutput, group_advantages, grpo_token_losses, k3_kl, reduce_token_losses,
                                 token_logps)
from tunelab.losses.preference import (KTOOutput, PreferenceOutput, bradley_terry_loss, dpo_loss, ipo_loss, kto_loss,
                                      orpo_loss, sequence_logps, simpo_loss)
from tunelab.losses.pretraining import masked_lm_loss, next_sentence_loss

__all__ = ["GRPOOutput", "KTOOutput", "PreferenceOutput", "bradley_terry_loss", "chunked_cross_entropy",
           "chunked_lm_loss", "chunked_token_lm_loss", "classification_loss", "dpo_loss", "group_advantages",
           "grpo_token_losses", "ipo_loss", "k3_kl", "kto_loss", "masked_lm_loss", "next_sentence_loss", "orpo_loss",
           "reduce_token_losses", "sequence_logps", "simpo_loss", "span_loss", "token_logps", "token_loss"]
