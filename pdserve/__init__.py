"""pdserve's composition root: the Ray Serve application (serve_app), its replicas and
router ingress, the previous Ray-core launcher, and the `pdserve` CLI. Nothing else imports it."""
