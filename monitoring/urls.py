from django.contrib.auth import views as auth_views
from django.urls import path

from monitoring import actions, views

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="console/login.html"), name="console-login"),
    path("logout/", auth_views.LogoutView.as_view(), name="console-logout"),
    path("", views.federation_list, name="console-federations"),
    path("federations/new/", actions.federation_create, name="console-federation-create"),
    path("federations/<int:federation_id>/", views.federation_overview, name="console-overview"),
    path("federations/<int:federation_id>/snapshot", views.federation_snapshot, name="console-snapshot"),
    path("federations/<int:federation_id>/nodes/", views.node_list, name="console-nodes"),
    path("federations/<int:federation_id>/rounds/<int:number>/", views.round_detail, name="console-round"),
    path("federations/<int:federation_id>/ledger/", views.privacy_ledger, name="console-ledger"),
    path("federations/<int:federation_id>/tokens/", actions.enrolment_tokens, name="console-tokens"),
    path("federations/<int:federation_id>/actions/<slug:action>/", actions.federation_action, name="console-federation-action"),
    path("federations/<int:federation_id>/nodes/<uuid:node_id>/<slug:action>/", actions.node_action, name="console-node-action"),
    path("audit/", views.audit_log, name="console-audit"),
]
