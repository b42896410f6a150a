"""Local submission: mail that `mailhaven sendmail` drops on disk, picked up into the queue.

`dropfile` is the on-disk format and its writer (run in the user's process by `sendmail`);
`collector` is the daemon's side, which moves complete drop files into the queue through intake
(Postfix's maildrop and pickup). In: files under `<state_dir>/maildrop/`. Out: queued messages.
May import intake, spool and proto; nothing here speaks SMTP.
"""
