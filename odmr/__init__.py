"""odmrd: an On-Demand Mail Relay (RFC 2645) provider and customer.

One message's path through the package:

    intake (intake_workers) / enqueue / bounce ─> submission ─> spool   (taking mail)
    odmr_session ─ATRN, Handoff─> delivery <─jobs, results─> queuemgr ─> spool, bounce
    bounce_relay (spool/.outbound) <─results─> queuemgr                 (handing it over)
    fetch ─> fetch_client ─> fetch_relay | fetch_server + fetch_mailbox  (the customer)

`submission` is the one writer into the queue and `spool` its one reader;
`queuemgr` owns what happens to a message after a delivery attempt (by a
customer or the bounce relay), and `delivery` only speaks SMTP. README.md
("Development") names the job of every module.
"""

__version__ = "0.1.0"
