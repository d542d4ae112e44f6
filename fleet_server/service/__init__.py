"""Fleet server services: the workers that connect MQTT, the database and the pure core.

* :mod:`.processor` - handling inbound messages in batches (enrollment, attest.request, evidence);
* :mod:`.scheduler` - periodic re-attestation from the schedule in the database, missed challenges;
* :mod:`.outbox` - publishing messages that admin commands and state changes wrote to the database;
* :mod:`.admin` - administrator operations (approve, revoke, quarantine, pre-register, policies);
* :mod:`.worker` - one worker process (threads, shutdown) and running N of them;
* :mod:`.context`, :mod:`.policies`, :mod:`.common` - what they share.
"""
