"""What boot.py and update_boot_status.py share, one concern per module.

errors: the exception hierarchy and exit codes; logs: log lines for the
journal, and strings from outside made safe to log; config: ento.conf;
files: bounded reads, durable writes, trusted folders; lock: one run at a
time; retries: the run's deadline and backoff; certs: certificates and key
pairs; clock: a clock that is provably wrong; mqtt: one MQTT connection with
bounded waits; fleet: fleet provisioning over AWS's IotIdentityClient; keys:
a key made on the device and its CSR; credentials: CERT_DIR, staged and
installed credentials; aside: another camera's pair set aside; check:
boot.py --check, the same checks without doing anything.

Importing the package does nothing but define things; awscrt and
cryptography are loaded only where they are used.
"""
