"""Loss functions as pure tensor functions (this package imports nothing from tunelab).

Every loss returns the SUM over its targets together with the number of targets, so the trainer can
normalise by the targets of the whole accumulated batch (batch 8 == 4 x 2 accumulation).
"""

from tunelab.losses.cross_entropy import (chunked_cross_entropy, chunked_lm_loss, chunked_token_lm_loss,
                                          classification_loss, span_loss, token_loss)
from tunelab.losses.pretraining import masked_lm_loss, next_sentence_loss

__all__ = ["chunked_cross_entropy", "chunked_lm_loss", "chunked_token_lm_loss", "classification_loss", "masked_lm_loss",
           "next_sentence_loss", "span_loss", "token_loss"]
