"""Prepare a Label Studio data dir: migrate, create an admin user and a personal access token.

Runs with Label Studio's own interpreter (.venv-ls/bin/python), never imported by the tests:
    LABEL_STUDIO_BASE_DATA_DIR=DIR .venv-ls/bin/python ls_bootstrap.py EMAIL PASSWORD
Prints one JSON line {"email", "password", "token"} as its last line of output.

The user is made the way `label-studio start --username` makes one (superuser, first
organization, active organization set); the token is what "Account & Settings -> Personal
Access Token" would show: a JWT refresh token, exchanged at /api/token/refresh/.
"""

import json
import os
import sys


def main() -> None:
    email, password = sys.argv[1], sys.argv[2]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "label_studio.core.settings.label_studio")
    from label_studio.server import _apply_database_migrations, _setup_env

    _setup_env()
    _apply_database_migrations()

    from jwt_auth.models import LSAPIToken
    from organizations.models import Organization
    from users.models import User

    user = User.objects.filter(email=email).first()
    if user is None:
        user = User.objects.create_user(email=email, password=password, username=email.split("@")[0])
    elif not user.check_password(password):
        # Only when it differs: a new password hash ends every browser session of the user (the
        # demo renews a revoked token with this script while its admin is logged in).
        user.set_password(password)
    user.is_staff = user.is_superuser = True
    user.save()
    org = Organization.objects.first()
    if org is None:
        org = Organization.create_organization(created_by=user, title="Label Studio")
    elif not org.has_user(user):
        org.add_user(user)
    user.active_organization = org
    user.save(update_fields=["active_organization"])

    token = LSAPIToken.for_user(user).get_full_jwt()
    print(json.dumps({"email": email, "password": password, "token": token}))


if __name__ == "__main__":
    main()
