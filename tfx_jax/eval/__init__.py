"""Evaluation of a model's parameters: the same numbers during training and after it.

What it measures (every key of `metrics` but fd's is also what training logs at
`train.eval_every`):
  losses    held-out text loss and perplexity, diffusion loss overall, per timestep bucket
            (eval/diffusion_loss_tNNNN) and per patch row (eval/diffusion_loss_rowRR), over
            `train.eval_batches` validation batches — always the same batches (`losses.rewind`).
  prompts   an image drawn for the caption of each prompt example, scored by the source's judge
            (`Source.judge`, a `data.judging.Judge`): per prompt split (the shapes world's
            train = seen shape/colour pairs, heldout = unseen ones)
            eval/judge/<split>/{attributes, objects, <each attribute>, count, exact, prompts},
            the same for one- and multi-object prompts (<split>/one_object,
            <split>/multi_object), and per object the judge's groups (the shapes world's
            pair_seen / pair_heldout, row_top / row_middle / row_bottom: the grid row it sits in,
            for any image mode). eval/judge_fraction = held-out objects fully right.
  captions  for the true image of each prompt example, a caption generated after it (image
            first, greedy), read back by the judge's caption reader and compared with the true
            scene: eval/caption/<split>/{attributes, objects (named exactly), ..., parsed}.
  document  (`command.evaluate_run` only) one interleaved document continued from a
            validation one.
  fd        (`command.evaluate_run` only, not logged in training: it trains a classifier
            once per data dir) the in-domain FD (a classifier of the source's own world, not
            ImageNet FID; `fd.py`) of the drawn images per prompt split against as many real
            ones, beside its noise floor (real vs real, the same count):
            eval/fd/<split>, eval/fd_floor/<split>, eval/diversity/<split> and
            eval/diversity_real/<split> (mean pairwise feature distance). Only for sources
            whose judge renders labelled images (`Judge.classifier_data`).

"attributes" is the share of (object, attribute) pairs right over the judge's attributes
(shape, colour, size and position); "objects" the share of objects with all of them right.
Sources without a judge get the losses, images and captions without scores.

Modules (imports go one way: train → eval, never back; eval never imports the CLI or the demo):
  losses.py   loss aggregation by timestep and patch row of any eval step (`loss_metrics`),
              `LossEval` (the train step's pure loss, given, jitted onto restored params), `rewind`
  prompts.py  prompt → image and image → text (`Prompting`), judged metrics (`prompt_metrics`)
  fd.py       the in-domain FD: distances, the cached classifier, `fd_metrics`
  command.py  `python -m tfx_jax eval` (`evaluate_run`, RUN/eval.json), `summary`, `config_brief`
"""
