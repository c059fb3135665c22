"""A simulated annotator that works Label Studio the way a person's browser does.

It signs up through the organization's invite link, ``/user/signup/?token=…`` (signup
without it is closed; an account made that way can log in on the web page, unlike
API-created users), logs in with a form post (CSRF cookie + session), takes tasks from the
labeling stream (``GET /api/projects/<id>/next/``) and submits through
``POST /api/tasks/<id>/annotations/``. It answers the gold label, except with probability
``error_rate`` another label at random (seeded, so runs are reproducible). A record it has
no gold label for is skipped, as a person would press "Skip".

``enlist`` creates (or reuses) such an account with a random password and records it in
``state/labelstudio/annotators.json`` (0600, like the admin's credentials): email, password
and user id. Sync accepts annotations only from the admin, these recorded annotators and the
emails of ``AFFECTLOOP_LABEL_STUDIO_ANNOTATORS``.
"""

from __future__ import annotations

import logging
import random
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import requests

from core.io import atomic_write_json, read_json
from core.layout import LabelStudioLayout
from tasks.labelstudio.project import FROM_NAME, TO_NAME

if TYPE_CHECKING:
    from tasks.labelstudio.client import LabelStudioClient

log = logging.getLogger(__name__)


class AnnotatorError(RuntimeError):
    pass


@dataclass
class AnnotationStats:
    email: str
    annotated: int = 0
    correct: int = 0
    skipped: int = 0
    task_ids: list[int] = field(default_factory=list)


class SimulatedAnnotator:
    """One annotator account driving Label Studio over its web API with a browser session."""

    def __init__(self, base_url: str, email: str, password: str, labels: Sequence[str],
                 gold: Mapping[str, str], error_rate: float = 0.0, seed: int = 0, timeout_s: float = 30.0) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError("error_rate must be in [0, 1]")
        self.base_url = base_url.rstrip("/")
        self.email = email
        self._password = password
        self.labels = tuple(labels)
        self.gold = dict(gold)
        self.error_rate = error_rate
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.user_id: int | None = None

    def __repr__(self) -> str:
        return f"SimulatedAnnotator(email={self.email!r}, error_rate={self.error_rate})"

    # ------------------------------------------------------------------ account
    def _form_post(self, path: str, fields: dict[str, str]) -> requests.Response:
        """Post a Django form the way the browser does: CSRF cookie from a GET, then the form."""
        url = f"{self.base_url}{path}"
        self.session.get(url, timeout=self.timeout_s).raise_for_status()
        token = self.session.cookies.get("csrftoken")
        if not token:
            raise AnnotatorError(f"no CSRF cookie from {url}")
        return self.session.post(url, data={"csrfmiddlewaretoken": token, **fields}, timeout=self.timeout_s,
                                 headers={"Referer": url}, allow_redirects=False)

    def _whoami(self) -> dict | None:
        response = self.session.get(f"{self.base_url}/api/current-user/whoami", timeout=self.timeout_s)
        return response.json() if response.status_code == 200 else None

    def login(self, invite_path: str | None = None) -> "SimulatedAnnotator":
        """Log in (signing up through ``invite_path``, ``/user/signup/?token=…``, if the account is new)."""
        response = self._form_post("/user/login/", {"email": self.email, "password": self._password})
        user = self._whoami() if response.status_code == 302 else None
        if user is None:
            self.session.cookies.clear()
            response = self._form_post(invite_path or "/user/signup/",
                                       {"email": self.email, "password": self._password, "allow_newsletters": "false"})
            user = self._whoami() if response.status_code == 302 else None
            if user is None:
                raise AnnotatorError(f"could not sign up or log in {self.email} "
                                     f"(HTTP {response.status_code} from /user/signup/)")
        self.user_id = int(user["id"])
        return self

    def session_cookies(self) -> dict[str, str]:
        """The browser session (for a headless browser to open the same pages)."""
        return self.session.cookies.get_dict()

    # ------------------------------------------------------------------ labeling
    def _answer(self, record_id: str) -> tuple[str | None, bool]:
        truth = self.gold.get(record_id)
        if truth is None:
            return None, False
        if self.rng.random() < self.error_rate:
            return self.rng.choice([label for label in self.labels if label != truth]), False
        return truth, True

    def _headers(self, project_id: int) -> dict[str, str]:
        return {"X-CSRFToken": self.session.cookies.get("csrftoken", ""),
                "Referer": f"{self.base_url}/projects/{project_id}/data"}

    def annotate(self, task_id: int, project_id: int, label: str | None, lead_time_s: float = 3.0) -> int:
        """Submit one annotation (label None: skip the task). Returns the annotation id."""
        if label is None:
            body = {"result": [], "was_cancelled": True, "lead_time": lead_time_s, "project": project_id}
        else:
            body = {"result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                "value": {"choices": [label]}, "origin": "manual"}],
                    "lead_time": lead_time_s, "project": project_id}
        response = self.session.post(f"{self.base_url}/api/tasks/{task_id}/annotations/?project={project_id}",
                                     json=body, headers=self._headers(project_id), timeout=self.timeout_s)
        if response.status_code != 201:
            raise AnnotatorError(f"{self.email}: annotating task {task_id} gave HTTP {response.status_code}: "
                                 f"{response.text[:300]}")
        return int(response.json()["id"])

    def annotate_pending(self, project_id: int, limit: int | None = None) -> AnnotationStats:
        """Work the project's labeling stream until it has nothing left for this annotator."""
        if self.user_id is None:
            self.login()
        stats = AnnotationStats(self.email)
        seen: set[int] = set()
        while limit is None or stats.annotated + stats.skipped < limit:
            response = self.session.get(f"{self.base_url}/api/projects/{project_id}/next/", timeout=self.timeout_s)
            if response.status_code == 404:
                break  # nothing left in the stream for this user
            if response.status_code != 200:
                raise AnnotatorError(f"{self.email}: next task gave HTTP {response.status_code}")
            task = response.json()
            task_id = int(task["id"])
            if task_id in seen:
                # The stream handed back a task already answered: stop rather than loop.
                break
            seen.add(task_id)
            label, correct = self._answer(str(task["data"].get("record_id")))
            self.annotate(task_id, project_id, label)
            stats.task_ids.append(task_id)
            if label is None:
                stats.skipped += 1
            else:
                stats.annotated += 1
                stats.correct += correct
        return stats


def recorded_annotators(state: LabelStudioLayout) -> dict[str, dict]:
    """email -> {password, user_id, url} of the accounts ``enlist`` created (state, 0600)."""
    return dict((read_json(state.annotators, default={}) or {}).get("annotators", {}))


def enlist(client: "LabelStudioClient", state: LabelStudioLayout, email: str, labels: Sequence[str],
           gold: Mapping[str, str], error_rate: float = 0.0, seed: int = 0) -> SimulatedAnnotator:
    """A logged-in annotator account the project created: invited, random password, recorded in state."""
    email = email.strip().lower()
    known = recorded_annotators(state)
    entry = known.get(email)
    if entry is None or entry.get("url") != client.url:
        # Recorded before the signup: a crash in between leaves a password we still know.
        entry = {"password": secrets.token_urlsafe(18), "user_id": None, "url": client.url}
        known[email] = entry
        _save_annotators(state, known)
    annotator = SimulatedAnnotator(client.url, email, entry["password"], labels, gold, error_rate=error_rate, seed=seed)
    annotator.login(invite_path=client.invite_path())
    if entry.get("user_id") != annotator.user_id:
        known[email] = {**entry, "user_id": annotator.user_id}
        _save_annotators(state, known)
    return annotator


def _save_annotators(state: LabelStudioLayout, annotators: Mapping[str, dict]) -> None:
    state.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_json(state.annotators, {"annotators": dict(annotators)}, mode=0o600)


def annotate_with_team(client: "LabelStudioClient", project_id: int, labels: Sequence[str], gold: Mapping[str, str],
                       state: LabelStudioLayout, n_annotators: int = 1, error_rate: float = 0.1, seed: int = 0,
                       domain: str = "annotators.affectloop.local") -> list[AnnotationStats]:
    """Several simulated annotators (ann1@…, ann2@…) each work through the project's stream."""
    results = []
    for i in range(1, n_annotators + 1):
        annotator = enlist(client, state, f"ann{i}@{domain}", labels, gold, error_rate=error_rate,
                           seed=seed * 1000 + i)
        results.append(annotator.annotate_pending(project_id))
    return results
