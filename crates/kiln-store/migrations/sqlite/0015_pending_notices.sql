-- The notifier's read of the due webhook notices asks, for every pending notice,
-- whether its URL's oldest pending notice is due. With no index by URL each of those
-- questions read every pending notice, so one read took time in the square of what
-- was pending: 47 s for 20,000 notices held back by a webhook that was down. These
-- are PostgreSQL's indexes since its 0001: the pending notices by URL in order, and a
-- build's notices by kind (whether its end was announced).
CREATE INDEX notifications_pending ON notifications (url, id)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;
CREATE INDEX notifications_build ON notifications (build, kind, seq);
