"""A simulated annotator that works Label Studio the way a person's browser does.

It signs up through ``/user/signup/`` (so the account can log in on the web page, unlike
API-created users), logs in with a form post (CSRF cookie + session), takes tasks from the
labeling stream (``GET /api/projects/<id>/next/``) and submits through
``POST /api/tasks/<id>/annotations/``. It answers the gold label, except with probability
``error_rate`` another label at random (seeded, so runs are reproducible). A record it has
no gold label for is skipped, as a person would press "Skip".
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import requests

from tasks.labelstudio.project import FROM_NAME, TO_NAME

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

    def login(self) -> "SimulatedAnnotator":
        """Log in (signing up first if the account does not exist yet)."""
        response = self._form_post("/user/login/", {"email": self.email, "password": self._password})
        user = self._whoami() if response.status_code == 302 else None
        if user is None:
            self.session.cookies.clear()
            response = self._form_post("/user/signup/", {"email": self.email, "password": self._password,
                                                          "allow_newsletters": "false"})
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


def annotate_with_team(base_url: str, project_id: int, labels: Sequence[str], gold: Mapping[str, str],
                       n_annotators: int = 1, error_rate: float = 0.1, seed: int = 0,
                       password: str = "simulated-annotator-pw", domain: str = "annotators.affectloop.local"
                       ) -> list[AnnotationStats]:
    """Several simulated annotators (ann1@…, ann2@…) each work through the project's stream."""
    results = []
    for i in range(1, n_annotators + 1):
        annotator = SimulatedAnnotator(base_url, f"ann{i}@{domain}", password, labels, gold,
                                       error_rate=error_rate, seed=seed * 1000 + i)
        results.append(annotator.login().annotate_pending(project_id))
    return results
