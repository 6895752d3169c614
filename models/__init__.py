"""Pure math of driftrec's learners: no Kafka, no Redis, no HTTP here.

Each estimator lives in its own module and follows River's verbs (``learn_one``,
``predict_one``) with batched ``learn_many`` / ``predict_many`` variants.
"""
